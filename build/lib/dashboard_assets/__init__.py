"""Static files of the dashboard and the docs page (read by dashboard.py; shipped as package data)."""
