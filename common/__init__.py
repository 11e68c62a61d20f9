"""Shared toolkit for the recipes: plain functions, one concern a module."""
