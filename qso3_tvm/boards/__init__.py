"""Boards: the firmware RPC server (native or emulated under qemu), serial provisioning, profiling over RPC."""
