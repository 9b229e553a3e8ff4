"""The ModelsLab Imagine bot. Its version and home, here once: pyproject.toml reads the version from here, and
the bot names both in the User-Agent of its own calls to Discord."""

__version__ = "0.1.0"
# The project's repository, also in pyproject.toml's [project.urls] (a test keeps the two the same). A placeholder
# until the project is published: forks set their own.
PROJECT_URL = "https://github.com/modelslab-imagine/modelslab-imagine-bot"
