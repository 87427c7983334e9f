"""What the tests share and are not tests themselves: the ComfyUI host and the pack imported as a
package (comfy_host), a headless ComfyUI server (comfy_server) and a browser on its front end
(browser_ui), the tiny LTXAV checkpoints (tiny_ltxav), the float64-reference tolerance rule
(numerics), the sequence-parallel cases and their multi-process runner (sp_cases, sp_harness), other
node packs in the test host (node_packs), ComfyUI's official templates on tiny stand-ins
(official_templates) and a test-only float64 checkpoint loader for the servers (float64_nodes).

Imported as ``helpers.<module>``: pytest puts tests/ on sys.path (conftest.py's folder, the default
"prepend" import mode), and spawned rank processes inherit that path.
"""
