"""The model store: recorded plans, the task registry, stored graphs, downloads and resources."""
