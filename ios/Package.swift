// swift-tools-version:5.9
// PocketLM for iOS: the generated Swift bindings over pocketlmFFI.xcframework
// (built by build-xcframework.sh). Add this directory as a local package in Xcode.
import PackageDescription

let package = Package(
    name: "PocketLM",
    platforms: [.iOS(.v15)],
    products: [
        .library(name: "PocketLM", targets: ["PocketLM"]),
    ],
    targets: [
        // Static libpocketlm.a per platform + pocketlmFFI.h + module map (module pocketlmFFI).
        .binaryTarget(name: "pocketlmFFI", path: "pocketlmFFI.xcframework"),
        // Sources/PocketLM/pocketlm.swift is a link to ../bindings/swift/pocketlm.swift.
        .target(name: "PocketLM", dependencies: ["pocketlmFFI"], path: "Sources/PocketLM"),
    ]
)
