"""CDM builders: set-based SQL in the warehouse's staging schema, one module per family."""
