"""Tables and plots a person reads (matplotlib, pandas)."""
