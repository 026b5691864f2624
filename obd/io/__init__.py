"""Random-access byte sources and the file helpers every layer of the engine shares."""
