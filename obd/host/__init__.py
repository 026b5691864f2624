"""What obd uses of the host machine: the external programs it drives (nbdkit among them)."""
