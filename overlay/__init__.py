"""overlay: scale stateful traffic managers side by side over a user-mode GRE-in-UDP overlay."""

__version__ = "0.1.0"
