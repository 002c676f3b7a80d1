"""Config system: `get_config(arg)` files, command-line overrides and durations."""
from siglip_fair.config.durations import resolve_steps, to_steps
from siglip_fair.config.loading import (ConfigError, apply_overrides, get_config, load_config_file,
                                        parse_arg, split_override_args)

__all__ = ["ConfigError", "apply_overrides", "get_config", "load_config_file", "parse_arg",
           "resolve_steps", "split_override_args", "to_steps"]
