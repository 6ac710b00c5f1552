// Bundle the workspace into dist/: content-hashed assets, a manifest, and index.html.
import * as esbuild from 'esbuild';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { basename } from 'node:path';

const dist = new URL('./dist/', import.meta.url);
await rm(dist, { recursive: true, force: true });
await mkdir(new URL('assets/', dist), { recursive: true });

const result = await esbuild.build({
  entryPoints: { app: 'src/app.js' },
  bundle: true,
  splitting: true,
  format: 'esm',
  target: ['chrome100', 'firefox100', 'safari15'],
  minify: true,
  sourcemap: false,
  legalComments: 'none',
  outdir: 'dist/assets',
  entryNames: '[name]-[hash]',
  chunkNames: 'chunk-[hash]',
  assetNames: '[name]-[hash]',
  metafile: true,
  logLevel: 'warning',
});

const manifest = {};
for (const [file, output] of Object.entries(result.metafile.outputs)) {
  if (output.entryPoint === 'src/app.js') {
    manifest['app.js'] = `assets/${basename(file)}`;
    if (output.cssBundle) manifest['app.css'] = `assets/${basename(output.cssBundle)}`;
  }
}
if (!manifest['app.js'] || !manifest['app.css']) throw new Error('the bundle lacks app.js or app.css');
const html = (await readFile('index.html', 'utf8'))
  .replace('%APP_JS%', manifest['app.js']).replace('%APP_CSS%', manifest['app.css']);
await writeFile(new URL('index.html', dist), html);
// Written last: the server reloads the bundle when the manifest changes.
await writeFile(new URL('manifest.json', dist), JSON.stringify(manifest, null, 2) + '\n');
