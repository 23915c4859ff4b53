"""Test support: real peers (Mosquitto) and throwaway TLS material."""
