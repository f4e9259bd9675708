"""task_modules."""
