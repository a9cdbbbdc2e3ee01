"""The bastion service: people's SSH to machines, checked against users and grants, relayed
with a short-lived certificate, recorded as asciicast and audited on the bus."""
