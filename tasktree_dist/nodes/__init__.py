"""Node classes: leaves do work, composites order children, decorators change one child's outcome."""
