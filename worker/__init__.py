"""Celery workers: validate uploaded log files and compute influence with the dvemb core."""
