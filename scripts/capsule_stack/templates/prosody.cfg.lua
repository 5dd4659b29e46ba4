-- Private Prosody of a Capsule test stack: loopback only, SQL storage in the stack's MariaDB.
-- mod_limits is not loaded (no rate limit); offline storage has no per-user cap.
run_as_root = true
daemonize = false
pidfile = "$dir/prosody.pid"
data_path = "$dir/data"
admin_socket = "$dir/prosody.sock"
log = { info = "$dir/prosody.log" }
interfaces = { "127.0.0.1" }
local_interfaces = { "127.0.0.1" }
c2s_ports = { $c2s_port }
c2s_direct_tls_ports = {}
s2s_ports = {}
http_ports = {}
https_ports = {}
c2s_require_encryption = true
s2s_require_encryption = true
authentication = "internal_hashed"
admins = { "admin@$domain" }  -- XEP-0133 service administration (mod_admin_adhoc)
storage = "sql"
sql = { driver = "MySQL", database = "$db_name", username = "$db_user", password = "$db_password", host = "127.0.0.1", port = $db_port }
allow_registration = true  -- in-band registration (XEP-0077); 127.0.0.1 is not throttled
default_archive_policy = true
archive_expires_after = "never"
max_archive_query_results = 250
modules_enabled = {
  "roster"; "saslauth"; "tls"; "disco"; "carbons"; "pep"; "private"; "vcard4"; "vcard_legacy";
  "mam"; "offline"; "ping"; "admin_shell"; "smacks"; "register"; "admin_adhoc";
}
modules_disabled = { "s2s" }
-- where certmanager looks for more (default: a certs/ beside the config, which does not exist)
certificates = "$dir"
-- XEP-0198 (smacks): a dead client's session waits this long for its resumption, then what it had
-- not acked goes to offline storage (the last session of the account) or back to the sender
smacks_hibernation_time = 10
ssl = { certificate = "$dir/server.crt", key = "$dir/server.key" }

VirtualHost "$domain"
  ssl = { certificate = "$dir/server.crt", key = "$dir/server.key" }

Component "conference.$domain" "muc"
  muc_room_default_public_jids = true  -- non-anonymous: capsules need the occupants' real JIDs
  muc_room_locking = false
