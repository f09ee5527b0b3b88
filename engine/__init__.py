"""tunequant engine: everything that is not UI. Importing it never imports torch."""
