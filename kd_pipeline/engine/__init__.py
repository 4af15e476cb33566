"""DeepSpeed engines, modules, metrics and stopping used by the recipes."""
