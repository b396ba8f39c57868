"""modalign: a workbench for cross-modal alignment research.

Importing the package is cheap: no torch, no sentence-transformers. Heavy modules are imported
where they are used.
"""

__version__ = "0.1.0"
