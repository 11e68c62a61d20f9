"""One standalone script per model card: ./run.sh <name> (python -m recipes.<name> from the repository root)."""
