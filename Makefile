# Checks, style and tests, as PEFT has them. Uses the project venv when there is one.
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: style quality test docs

# format and fix what can be fixed
style:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# what CI checks: lint, formatting, types (mypy's config is in pyproject.toml), the docs
quality:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(PYTHON) -m mkdocs build --strict --quiet

test:
	$(PYTHON) -m pytest -q

docs:
	$(PYTHON) -m mkdocs build --strict --quiet
