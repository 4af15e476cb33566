"""DeepSpeed engines, modules, metrics, collectives and stopping used by the recipes."""
