"""The inspector behind ``obd inspect``: what blobs, RW layers and stacks are made of, and plots of it."""
