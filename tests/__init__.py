"""The project's own tests of detr/, parity/, fixtures, markers and reports."""
