"""The headless engine: model I/O, recipes, the runner, evaluation and export. Never imports Qt."""
