export const exts = [];
export const app = { registerExtension(e) { exts.push(e); }, graph: { getNodeById: (id) => globalThis.nodes[id] } };
