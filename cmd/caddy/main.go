// Command caddy builds Caddy with the standard modules and the api_key handler,
// so the module can be run without xcaddy: go run ./cmd/caddy run --config Caddyfile.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/keystile/caddy-apikey"
)

func main() {
	caddycmd.Main()
}
