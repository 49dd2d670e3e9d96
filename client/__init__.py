"""The client side: local DP-SGD training of the adapter and the Flower ClientApp around it."""
