"""npm's test kit, shipped with the npm plugin: Verdaccio and the JavaScript clients
(`services`), helpers that drive npm, pnpm and yarn (`clients`), and several replicas behind
nginx with an npm upstream (`ha`). Its pytest plugin (`plugin`) adds the `node_tools` and
`verdaccio` fixtures to the generic ones of `batlehub.testing`."""
