"""rome-lightning: find where a language model stores a fact and change it (ROME, MEMIT, AlphaEdit, UltraEdit).

The Python API: ``rome.edit``, ``rome.ask``, ``rome.load_model`` (``rome/api.py``); the command line: ``rome``
or ``python train.py`` (``rome/cli.py``); the library: ``rome.pipeline`` (model-agnostic math and plumbing),
``rome.modules`` and ``rome.datamodules`` (Lightning), ``rome.recipes`` (the stages), defaults in ``configs/``.

Why the library's folders sit beside this package in the repository and inside it once installed: the
repository keeps the design card's top level (``pipeline/ modules/ datamodules/ recipes/ configs/``), while a
wheel puts one package into site-packages, ``rome``, so that nothing named ``pipeline`` or ``modules`` collides
with a user's own code (pyproject.toml maps each folder to ``rome.<folder>``). In a checkout, this package's
path reaches the folders beside it, so the same names import the same files either way.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
if not (_HERE / "pipeline").is_dir() and (_HERE.parent / "pipeline" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # a checkout: rome.pipeline is ../pipeline  # noqa: F821 (a package's)

# ``import rome`` stays instant (``rome --help`` answers in well under a second): the API and its torch,
# transformers and Lightning imports load on first use of a name
_API = ("edit", "ask", "load_model", "EditReport", "Step", "Answers", "LoadedModel", "UserError")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from rome import api

        return getattr(api, name)
    raise AttributeError(f"module 'rome' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
