// A real OpenID Provider for the tests (the npm package oidc-provider, installed by scripts/test in
// tests/oidc/node): one confidential client, the accounts given, its development sign-in and consent pages.
//
// node provider.js CONFIG_JSON, where CONFIG_JSON is
//   {"client_id", "client_secret", "redirect_uris": [...],
//    "accounts": {"LOGIN": {"email": ..., "email_verified": ...}},
//    "email_in_id_token": true|false}
// Listens on a free loopback port and prints one line, "listening PORT", once it serves; its issuer is
// http://127.0.0.1:PORT. Ends on SIGTERM.
'use strict';

const crypto = require('node:crypto');
const http = require('node:http');
const path = require('node:path');
const { createRequire } = require('node:module');
const { pathToFileURL } = require('node:url');

async function main() {
  const config = JSON.parse(process.argv[2]);
  const requireHere = createRequire(path.join(__dirname, 'node', 'package.json'));
  const { default: Provider } = await import(pathToFileURL(requireHere.resolve('oidc-provider')).href);

  const server = http.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;

  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), use: 'sig', alg: 'RS256' };

  const provider = new Provider(issuer, {
    clients: [{
      client_id: config.client_id,
      client_secret: config.client_secret,
      redirect_uris: config.redirect_uris,
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    async findAccount(_ctx, id) {
      const account = config.accounts[id];
      if (!account) return undefined;
      return { accountId: id, async claims() { return { sub: id, ...account }; } };
    },
    claims: { openid: ['sub'], email: ['email', 'email_verified'] },
    // false: the email claims ride in the ID token, as most providers send them; true: only from userinfo.
    conformIdTokenClaims: !config.email_in_id_token,
    pkce: { required: () => true, methods: ['S256'] },
    features: { devInteractions: { enabled: true } },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    jwks: { keys: [signingKey] },
    ttl: { AccessToken: 600, AuthorizationCode: 60, IdToken: 600, Interaction: 600, Session: 600, Grant: 600 },
    renderError(ctx, out) {
      ctx.type = 'json';
      ctx.body = out;
    },
  });
  provider.on('server_error', (_ctx, err) => console.error('provider server_error', err));
  server.on('request', provider.callback());
  process.on('SIGTERM', () => { server.close(() => process.exit(0)); server.closeAllConnections(); });
  console.log(`listening ${port}`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
