"""The ``influencer`` application: command line, configuration, the explain pipeline, report and store."""
