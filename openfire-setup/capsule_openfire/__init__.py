"""Scripts that install, provision and verify Openfire with MariaDB/MySQL, archiving and TLS
certificates from Capsule's CA (``openfire-setup/install``, ``provision``, ``verify``)."""
