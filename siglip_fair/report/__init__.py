"""Reports: side-by-side summary tables (JSON / Markdown) and plots."""
from siglip_fair.report.plots import plot_bias_bars, plot_training_curves
from siglip_fair.report.summary import format_table, write_summary

__all__ = ["format_table", "plot_bias_bars", "plot_training_curves", "write_summary"]
