"""State of the service: schema (models), connections and migrations (session)."""
