"""The private loopback stack, its command line, the demo and the stack fixtures: tooling, not part of
``import capsule``; it sits above ``capsule`` and ``capsule_ca`` and below ``capsule_openfire``."""
