"""Multi-node deployment: one description (topology.py) from which docker-compose.yml and the loopback test derive."""
