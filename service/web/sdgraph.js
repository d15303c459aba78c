// sdgraph's frontend extension: the default workflow ("Load Default Workflow", and a new user's first page) is
// sdgraph's graphs/txt2img.json, which runs with the bundled demo model, instead of the frontend's built-in one
// (it uses a checkpoint we do not ship). The frontend loads its default graph object when it starts, so the
// object is filled in place before that.
const target = window.comfyAPI?.defaultGraph?.defaultGraph;
const api = window.comfyAPI?.api?.api;
if (target && api) {
  const response = await fetch(api.apiURL("/sdgraph/default_workflow"), { cache: "no-store" });
  if (response.ok) {
    const graph = await response.json();
    for (const key of Object.keys(target)) delete target[key];
    Object.assign(target, graph);
  } else {
    console.warn("sdgraph: no default workflow", response.status);
  }
}
