"""Code that every Warden service and client shares: contracts, subjects, streams, settings, logging."""
