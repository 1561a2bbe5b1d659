"""Controls on what goes in and what comes out of a model (content policy), used by serve and the CLI alike;
they know no HTTP."""
