"""Support for testing the stack from outside: fault injection (faults.py). Production code only calls hooks."""
