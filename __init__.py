"""diffedit: DiffEdit (Couairon et al., ICLR 2023) over whole image datasets, on Ray Data.

The repository root is this package: ``diffedit.stages`` holds the algorithm (plain PyTorch),
``diffedit.pipelines`` the Ray Data job and the CLI, ``diffedit.manifests`` the output format.

    >>> import diffedit
    >>> editor = diffedit.load()                      # the shipped model, or a diffusers folder / hub id
    >>> results = editor.edit(images, ["a red circle"], ["a blue circle"])
"""

__version__ = "0.1.0"

__all__ = ["DiffEditor", "load", "__version__"]


def __getattr__(name):
    # Lazy, so that `import diffedit` (and the CLI's --help) does not import torch.
    if name in ("DiffEditor", "load"):
        from .stages import editor

        return getattr(editor, name)
    raise AttributeError(f"module 'diffedit' has no attribute {name!r}")
