"""The PySide6 front end. Holds no algorithm: it drives studio.core through worker threads."""
