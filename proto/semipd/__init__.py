"""semipd protocol buffers."""
