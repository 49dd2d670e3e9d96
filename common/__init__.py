"""Code shared by the client and the server: config, data, model, adapters, privacy accounting."""
