"""Example user tasks (data only): see jobs/user_tasks/generate.py."""
