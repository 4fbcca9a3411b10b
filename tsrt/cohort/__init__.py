"""Cohorts: many cases in one resumable job, on this machine or on a Ray cluster."""
