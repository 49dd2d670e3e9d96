"""The server side: aggregation strategies, global evaluation and the privacy report."""
