"""What a bot author reuses in tests: the server-free stream harness (``stream``), ``Inbox``, the leak
check (``leaks``), offline enrollment (``identities``) and the opt-in ``stream_cast`` fixture
(``pytest_plugin``). Never loaded by ``import capsule``; the stack fixtures are in ``capsule_stack``."""
