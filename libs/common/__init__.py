"""What dockvm's services share: settings, logging, errors, retry, contracts, bus, db, runner."""
