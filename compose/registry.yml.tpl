# Distribution 2.x config for one datacenter's registry. @DC@ and @SECRET@ are filled in at
# container start (docker-compose.yml, profile backing), so the webhook secret never sits in a
# file of the repo.
version: 0.1
log:
  level: info
  fields:
    dc: @DC@
storage:
  filesystem:
    rootdirectory: /var/lib/registry
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:@PORT@
  headers:
    X-Content-Type-Options: [nosniff]
notifications:
  events:
    includereferences: true
  endpoints:
    - name: imagesync
      url: http://127.0.0.1:8081/v1/registry-events
      headers:
        Authorization: [Bearer @SECRET@]
        X-Dockvm-Dc: [@DC@]
      timeout: 2s
      threshold: 5
      backoff: 1s
      ignoredmediatypes:
        - application/octet-stream
